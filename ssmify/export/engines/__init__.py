"""Serving engines (vLLM, llama.cpp) that an export is run in, each in its own venv (`envs.py`)."""
