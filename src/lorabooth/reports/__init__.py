"""Pieces of the files lorabooth writes for people: grids, loss plots, HTML and markdown."""
