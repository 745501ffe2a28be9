"""`lorakit export`: a trained result for another runtime, one module per target.

gguf.py writes a merged model as GGUF for llama.cpp and Ollama (merging an adapter first), ollama.py the
Modelfile beside it, vllm.py the `vllm serve` command line that serves the adapters as they are.
"""
