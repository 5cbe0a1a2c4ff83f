"""skyrl-backend-minimal: the backend that docs/writing-a-backend.md builds."""
