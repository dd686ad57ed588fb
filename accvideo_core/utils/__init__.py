"""Small shared helpers: safe checkpoint reading and atomic writes (``io``), dtype names (``dtypes``), the PNG
writer (``png``) and the drawing canvas (``canvas``)."""
