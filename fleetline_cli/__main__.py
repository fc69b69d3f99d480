from fleetline_cli.main import app

app()
