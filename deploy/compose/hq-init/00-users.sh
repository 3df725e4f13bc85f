#!/bin/bash
# HQ's database and users for deploy/compose/hq.yml, with the passwords of the secret files
# (deploy/compose/make-secrets). Run once by the mariadb image's entrypoint, on the first start
# (empty data volume), which provides docker_process_sql. Nothing here has a default password.
set -euo pipefail
# A secret as an SQL string literal's content.
secret() {
  local v
  v=$(tr -d '\r\n' <"/run/secrets/$1")
  [ -n "$v" ] || { echo "00-users.sh: /run/secrets/$1 is empty" >&2; exit 1; }
  v=${v//\\/\\\\}
  printf '%s' "${v//\'/\'\'}"
}
docker_process_sql <<SQL
-- utf8 (utf8mb3), as OpenMRS's own schema.
CREATE DATABASE IF NOT EXISTS \`openmrs_hq\` DEFAULT CHARACTER SET utf8 COLLATE utf8_general_ci;
-- The HQ sink (and its --init): writer on HQ's database.
CREATE USER IF NOT EXISTS 'hq'@'%' IDENTIFIED BY '$(secret hq_password)';
GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, ALTER, INDEX, DROP, REFERENCES,
      CREATE TEMPORARY TABLES, LOCK TABLES, CREATE VIEW, SHOW VIEW
  ON \`openmrs_hq\`.* TO 'hq'@'%';
-- Grafana's clinical dashboard: read only.
CREATE USER IF NOT EXISTS 'dashboards'@'%' IDENTIFIED BY '$(secret dashboards_password)';
GRANT SELECT ON \`openmrs_hq\`.* TO 'dashboards'@'%';
FLUSH PRIVILEGES;
SQL
