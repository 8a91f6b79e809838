"""The contract the API and the workers share: settings, job schema and states, job store,
object storage, the Celery app and its task names. Imports neither Flask nor torch."""
