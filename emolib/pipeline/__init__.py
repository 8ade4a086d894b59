"""The book pipeline: execute chapters with papermill, render with Jupyter Book, keep results and the README table."""
