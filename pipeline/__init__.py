"""The durable-stage engine. It knows nothing about medicine: a domain app declares a
workflow (an ordered list of stages, each with its function and retry policy) and the engine
runs it so that no worker crash, lost message or provider outage loses or repeats work.

This module is the engine's whole public surface (`__all__`): a domain imports names from
`pipeline`, never a module behind it (import-linter's contracts in `make lint` say so). The
names are loaded on first use, since Django imports this package before its tables exist.

Inside, the packages are the layers: `core` (declaring, storing, running, recovering),
`backends` (django-q2, Temporal), `llm` (the metered model gateway), `ops` (admin, dashboard,
metrics, health, checks). Each imports only those below it."""

import lazy_loader

# The names are those `__init__.pyi` imports; each module is imported on first use.
__getattr__, __dir__, __all__ = lazy_loader.attach_stub(__name__, __file__)
