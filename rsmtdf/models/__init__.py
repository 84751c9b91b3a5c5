"""The networks: frozen teachers (`teachers`) and their weights (`weights`), the student with its
fusion decoder (`student`), and checkpoints (`checkpoint`)."""
