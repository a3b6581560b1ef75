"""One APIRouter per resource; `zoedge.server.app` mounts them under /v1."""
