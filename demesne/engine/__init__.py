"""The engine process: scheduler, sampler and llama.cpp for one accelerator."""
