"""What each --mode of main.py does, built from the library pieces."""
