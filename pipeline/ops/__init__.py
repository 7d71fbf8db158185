"""What operators see and scrape: the admin, the dashboard and its charts, /metrics, /healthz
and /readyz, and the system checks of the configuration."""
