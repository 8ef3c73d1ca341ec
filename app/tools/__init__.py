"""Tools around the server: ``tileserver verify`` (an independent reference) and the demo and
test slide generator."""
