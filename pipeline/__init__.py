"""The durable-stage engine. It knows nothing about medicine: a domain app declares a
workflow (an ordered list of stages, each with its function and retry policy) and the engine
runs it so that no worker crash, lost message or provider outage loses or repeats work."""
