"""HTTP routers: thin; each parses the request, calls a service, shapes the response."""
