-- The HQ database of the Docker stack (docker-compose.yml); the same users, grants and default
-- passwords as deploy/mariadb/mariadb-up creates for the local `hq` instance.
-- Run once, by the mariadb image's entrypoint, on the first start (empty data volume).
-- The passwords are the defaults of omrs-stream.toml (${OMRS_HQ_PASSWORD:-hq}, ...).

-- utf8 (utf8mb3) like the OpenMRS schema the sites are built from.
CREATE DATABASE IF NOT EXISTS `openmrs_hq` DEFAULT CHARACTER SET utf8 COLLATE utf8_general_ci;

-- The HQ sink: writer on the HQ databases (openmrs_hq, and openmrs_hq_* for tests/verify).
CREATE USER IF NOT EXISTS 'hq'@'%' IDENTIFIED BY 'hq';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES,
      CREATE TEMPORARY TABLES, LOCK TABLES, CREATE VIEW, SHOW VIEW
  ON `openmrs\_hq%`.* TO 'hq'@'%';

-- Grafana's clinical dashboard (deploy/grafana/provisioning/datasources/hq-mysql.yml): read only.
CREATE USER IF NOT EXISTS 'dashboards'@'%' IDENTIFIED BY 'dashboards';
GRANT SELECT ON `openmrs_hq`.* TO 'dashboards'@'%';

-- Dev admin used by the simulator and the tests.
CREATE USER IF NOT EXISTS 'omrs'@'%' IDENTIFIED BY 'omrs';
GRANT ALL PRIVILEGES ON *.* TO 'omrs'@'%' WITH GRANT OPTION;

FLUSH PRIVILEGES;
