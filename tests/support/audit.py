"""What every command that reads or changes PHI is given in the tests: on whose behalf, and why."""

AUDITED = ("--actor", "test-operator", "--reason", "checked by the test suite")
