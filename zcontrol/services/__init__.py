"""zcontrol services: one package per resource, talking to each other only through the bus."""
