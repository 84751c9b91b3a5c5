"""From a recipe to parts and stage one: the resolve layer every command shares (`resolve`, `scaling`),
trained models read back (`trained`), and the teacher extraction into the cache (`extract`)."""
