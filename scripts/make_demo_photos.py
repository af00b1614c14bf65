"""Re-creates src/lorabooth/assets/demo_photos/: the demo's example subject,
a purple ball with yellow stripes in four scenes (drawn, not photographed, so
the project owns them). Run from the repository root."""

import random

from PIL import Image, ImageDraw, ImageFilter

SCENES = [((110, 170, 90), (80, 140, 60)), ((230, 215, 170), (210, 190, 140)),
          ((235, 240, 250), (200, 210, 225)), ((150, 120, 100), (120, 95, 80))]

for i, (sky, ground) in enumerate(SCENES):
    rnd = random.Random(i)
    im = Image.new("RGB", (128, 128), sky)
    d = ImageDraw.Draw(im)
    d.rectangle((0, 80, 128, 128), fill=ground)
    cx, cy, r = 64 + rnd.randint(-12, 12), 70 + rnd.randint(-6, 6), 30 + rnd.randint(-4, 4)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(120, 40, 170))
    for k in range(-2, 3):
        y = cy + k * 12
        d.line((cx - r + 4, y, cx + r - 4, y), fill=(250, 220, 40), width=4)
    d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=(60, 20, 90), width=2)
    im = im.filter(ImageFilter.GaussianBlur(0.6))
    im.save(f"src/lorabooth/assets/demo_photos/ball_{i}.png", optimize=True)
