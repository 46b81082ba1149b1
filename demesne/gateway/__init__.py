"""The gateway process: HTTP, auth, OpenAI shapes, chat templates, text; routes to engines."""
