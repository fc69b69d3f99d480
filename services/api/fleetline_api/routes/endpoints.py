"""Where devices reach the platform: what connection strings and provisioning answers
name (``FLEETLINE_API_DEVICE_MQTT_URL``), for tools that build device configurations."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from fleetline_api.deps import DevicesRead, SettingsDep
from fleetline_api.problems import RESPONSES
from fleetline_api.settings import device_mqtt_url

router = APIRouter(prefix="/v1/endpoints", tags=["devices"], responses=RESPONSES)


class Endpoints(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "device_mqtt_url": "mqtts://mqtt.example.org:8883",
                    "device_mqtt_host": "mqtt.example.org",
                    "device_mqtt_port": 8883,
                    "device_mqtt_tls": True,
                }
            ]
        }
    )
    device_mqtt_url: str = Field(description="mqtts://host:port (mqtt:// without TLS)")
    device_mqtt_host: str
    device_mqtt_port: int
    device_mqtt_tls: bool


@router.get("", summary="Where devices reach the broker", response_model=Endpoints)
async def endpoints(settings: SettingsDep, _key: DevicesRead) -> Endpoints:
    """The broker endpoint devices connect to."""
    target = settings.device_mqtt
    return Endpoints(
        device_mqtt_url=device_mqtt_url(settings),
        device_mqtt_host=target.host,
        device_mqtt_port=target.port,
        device_mqtt_tls=target.tls,
    )
