"""HTTP routers: dispatch only; the work happens in the serving modules."""
