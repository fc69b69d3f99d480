from fleetline.cli import app

app()
