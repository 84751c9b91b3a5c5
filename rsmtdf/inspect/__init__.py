"""Inspecting a cache offline (no GPU, no teacher weights): where each stored token lies on the
ground (`geometry`), what the features look like and whether views and teachers agree (`stats`),
and a static HTML page of it all (`html`)."""
