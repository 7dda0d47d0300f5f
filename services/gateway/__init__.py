"""The OpenAI-compatible HTTP gateway (services.gateway.app) and the playground page (static/)."""
