"""Small, fast experiments that reproduce the paper's toy claims, and the dependency-free plotting they use."""
