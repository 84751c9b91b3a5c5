"""Datasets and what describes them: class tables (`classes`), datasets of tiles read by window
(`datasets`, `tiling`), split lists (`splits`), band statistics (`bandstats`), what a loader worker
keeps (`tilecache`) and hands over (`batch`), and generated scenes for the demo and tests (`synthetic`)."""
