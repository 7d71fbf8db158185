"""The Temporal backend (`PIPELINE_BACKEND=temporal`), split as Temporal's samples are:
`workflow` (deterministic, sandboxed), `activities` (the engine's attempt path), `client`
(starting, waking and cancelling executions), `worker` (the process that serves the queues).

Nothing is imported here: the workflow sandbox imports this package."""
