"""``road-vlm board``: training runs and eval results at a glance, read-only, from the files road_vlm writes.

``runs`` finds and reads them; ``page`` renders one HTML page with inline SVG charts; ``commands`` serves it on
loopback (or writes it to a file).
"""
