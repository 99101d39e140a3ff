"""Sanity checks for the PostgreSQL fixtures in conftest.py."""

import psycopg2
import pytest
from sqlalchemy.engine import make_url


def _connect(url: str):
    u = make_url(url)
    conn = psycopg2.connect(
        host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=10
    )
    conn.autocommit = True
    return conn


def _query(url: str, sql: str):
    conn = _connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def test_select_one(postgres_url):
    assert postgres_url.startswith("postgresql+psycopg2://postgres@127.0.0.1:")
    assert _query(postgres_url, "select 1") == [(1,)]


def test_databases_are_distinct(postgres_url, make_postgres_url):
    other_url = make_postgres_url()
    assert make_url(other_url).database != make_url(postgres_url).database

    _query(postgres_url, "create table only_here (x int)")
    assert _query(postgres_url, "select to_regclass('only_here') is not null") == [(True,)]
    assert _query(other_url, "select to_regclass('only_here') is not null") == [(False,)]


def test_restart_keeps_data(postgres_server, postgres_url):
    port = postgres_server.port
    _query(postgres_url, "create table kept (id int primary key, name text)")
    _query(postgres_url, "insert into kept values (1, 'one'), (2, 'two')")

    postgres_server.restart()

    assert postgres_server.running
    assert postgres_server.port == port
    assert _query(postgres_url, "select id, name from kept order by id") == [
        (1, "one"),
        (2, "two"),
    ]


def test_stop_and_start(postgres_server, postgres_url):
    postgres_server.stop()
    assert not postgres_server.running
    with pytest.raises(psycopg2.OperationalError):
        _query(postgres_url, "select 1")

    postgres_server.start()
    assert postgres_server.running
    assert _query(postgres_url, "select 1") == [(1,)]


def test_url_uses_sqlalchemy_driver(postgres_server):
    assert postgres_server.url("foo") == (
        f"postgresql+psycopg2://postgres@127.0.0.1:{postgres_server.port}/foo"
    )
