import sys, tempfile
from pathlib import Path
import llama_cpp
from tests.gguf_fixtures import write_family
for fam in sys.argv[1:]:
    d = Path(tempfile.mkdtemp())
    _, _, tok, path = write_family(d, fam, "f16")
    try:
        llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=True)
    except Exception as e:
        print("FAIL", fam, e)
