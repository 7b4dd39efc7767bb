"""The Celery app and its pools: classify, conversations, agent, callbacks."""
