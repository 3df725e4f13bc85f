-- Users of an OpenMRS site database in the Docker stack (docker-compose.yml); the same users,
-- grants and default passwords as deploy/mariadb/mariadb-up creates for the local instances.
-- Run once, by the mariadb image's entrypoint, on the first start (empty data volume), before
-- 10-openmrs-demo.sql.gz loads the demo data into `openmrs`.
-- The passwords are the defaults of omrs-stream.toml (${OMRS_CDC_PASSWORD:-cdc}, ...).

-- The ingest agent: least privilege for a consistent snapshot plus binlog streaming.
CREATE USER IF NOT EXISTS 'cdc'@'%' IDENTIFIED BY 'cdc';
GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'cdc'@'%';
GRANT BINLOG MONITOR, SLAVE MONITOR ON *.* TO 'cdc'@'%';

-- Dev admin used by the simulator and the tests.
CREATE USER IF NOT EXISTS 'omrs'@'%' IDENTIFIED BY 'omrs';
GRANT ALL PRIVILEGES ON *.* TO 'omrs'@'%' WITH GRANT OPTION;

FLUSH PRIVILEGES;
