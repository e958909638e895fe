"""Config files shipped with the package (ml_collections `get_config()` modules)."""
