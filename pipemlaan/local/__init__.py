"""The local-learning math: auxiliary heads and the local module a rank owns."""
