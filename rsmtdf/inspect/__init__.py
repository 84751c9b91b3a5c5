"""Inspecting a cache offline (no GPU, no teacher weights): what it holds and its size (`summary`),
a sample's views beside its features (`show`), where each stored token lies on the ground
(`geometry`), what the features look like and whether views and teachers agree (`stats`), what
each storage kind costs against the rate–distortion bound and what the stored targets keep
(`compact`), the model step a recipe trains and its predicted time (`step`), and a static HTML page
of it all (`html`)."""
