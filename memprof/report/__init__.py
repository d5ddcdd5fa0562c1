"""Views: they take run records and never measure."""
