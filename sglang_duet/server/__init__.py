"""The HTTP server: main process (FastAPI + TokenizerManager), scheduler process, detokenizer process.

Start it with `python -m sglang_duet.launch_server` or `sglang-duet serve`.
"""
