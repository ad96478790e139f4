"""Evaluation on lm-evaluation-harness tasks (lm_eval_model.py: the engine's model as an lm-eval LM)."""
