"""The lofi daemon: JSON-RPC 2.0 over stdio, one job queue, one worker, a persistent track cache.

Read top-down: transport (lines) -> methods (dispatch) -> jobs (queue, worker) -> the pipeline
-> the engine. Nothing in this package imports an ML framework at import time; the worker
creates the engine when the first job runs. The protocol is documented in docs/protocol.md.
"""
