"""Background jobs (arq): each takes plain values, loads its state and acts."""
