"""PHI's trail and its end: the audit of every view and change, retention and purge."""
