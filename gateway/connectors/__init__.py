"""PLC connectors: Modbus, OPC UA, S7 devices polled (or subscribed to) into the twin, buffer and uplink."""
