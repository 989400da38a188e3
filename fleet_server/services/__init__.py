"""Services: the fleet server's behaviour. They take a session or the app context, raise domain
errors from ``fleet_server.errors``, and know nothing about HTTP."""
