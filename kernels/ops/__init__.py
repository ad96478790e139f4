"""One module per op, as kernels/csrc/ has one source per op: the autograd Function and the launcher
of its compiled entries (`_C.<op>_cpu`, `_C.<op>_cuda`), its argument checks, and the reasons the
native path can't take an input. kernels/__init__.py holds the table that dispatches to them.

Each function-like op module defines, with the public function's arguments (minus `backend`):
    check(*args)          raise ValueError for arguments no backend accepts
    problems(build, *args)  (unsupported, by_design): why the kernel can't take these inputs, and
                          where the reference is the intended op (only backend="native" overrides);
                          build is _C.build_info() ({} when the module is missing)
    native(ext, *args)    the compiled path (ext: the kernels._C module)
    fallback(*args)       the pure-PyTorch path (kernels/reference.py, the specification)
"""
