"""The engine's public API: every name the stub declares is there at run time, and the domain
reaches the engine through nothing else (import-linter holds the second in `make lint`)."""

import pipeline


def test_every_public_name_resolves_to_what_its_module_defines():
    assert len(pipeline.__all__) > 40
    for name in pipeline.__all__:
        value = getattr(pipeline, name)
        if callable(value):  # a class or function, not a constant such as MODEL_INPUT
            assert value.__name__ == name
            assert value.__module__.startswith("pipeline."), (name, value.__module__)


def test_an_unknown_name_is_an_attribute_error():
    try:
        pipeline.store_internals  # noqa: B018
    except AttributeError as exc:
        assert "store_internals" in str(exc)
    else:
        raise AssertionError("pipeline exported a name its stub does not declare")
