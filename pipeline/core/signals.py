"""What the engine tells the domain that it cannot judge itself."""

from django.dispatch import Signal

# Someone with `pipeline.view_phi` opened an engine admin page that shows what a domain handed
# the engine (stage outputs, model answers, tracebacks). Sent with `request`, `subject` (the
# run's subject) and `what` (which page, in words); the domain records it in its audit trail.
phi_viewed = Signal()
