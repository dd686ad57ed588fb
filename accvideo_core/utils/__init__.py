"""Small shared helpers: safe checkpoint reading and atomic writes."""
