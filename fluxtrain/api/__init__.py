"""HTTP layer: routers, schemas, auth and the mapping of domain errors to status codes."""
