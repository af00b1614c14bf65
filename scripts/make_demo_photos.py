"""Re-creates src/lorabooth/assets/demo_photos/: the toy world's held-out
subject (a purple striped ball) in 4 views on grass and beach, exactly as
`lorabooth toyworld claims` renders it. Run from the repository root."""

from pathlib import Path

from lorabooth.toyworld.claims import subject_photos

folder = Path("src/lorabooth/assets/demo_photos")
for old in folder.glob("*.png"):
    old.unlink()
subject_photos(folder)
