from zoedge.cli import app

app(prog_name="zoedge")
