"""The benchmark's parts: probes, runners for llama3 / transformers / llama.cpp, GGUF writing.

``scripts/benchmark.py`` is the command line over them."""
